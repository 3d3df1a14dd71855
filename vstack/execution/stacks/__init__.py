"""execution/stacks"""
