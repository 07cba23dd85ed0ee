"""The engine's core: status words, the settling rules and the one way an instance or a step stops.

Reading `settle.py` alone teaches the semantics of joins, routes and the end of an instance.
"""
