"""Reward servers: verifiers and preference models behind rpp.v1.RewardService.

Importing this package never imports torch; only the neural preference server needs it.
"""
