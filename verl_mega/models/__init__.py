"""verl_mega.models"""
