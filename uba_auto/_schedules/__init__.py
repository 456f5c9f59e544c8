"""Internals of :mod:`uba_auto.schedules`: step arrays, decay shapes, composition and factories.

Import the public names from :mod:`uba_auto.schedules`; these modules are its implementation.
"""
