"""The project's benchmarks (see README.md in this folder); not part of the installed package.

Run them from a checkout: ``python benchmarks/<script>.py`` or ``python -m benchmarks.<module>``.
"""
