"""verl_mega.trainer"""
