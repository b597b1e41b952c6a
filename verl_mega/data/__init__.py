"""verl_mega.data"""
