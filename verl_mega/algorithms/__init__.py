"""verl_mega.algorithms"""
