"""verl_mega.rewards"""
