"""verl_mega.rollout"""
