"""vnic"""
