"""dccp"""
