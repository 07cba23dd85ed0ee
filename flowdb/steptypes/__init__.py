"""Step types: one module each, registered in registry.py (`STEP_TYPES`); base.py says what a type owns.

Kept free of imports so that a type's module and the modules it uses may import base.py.
"""
