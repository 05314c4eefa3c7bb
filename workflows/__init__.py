"""Runs that compose several stages: the training driver, the embed, caption and reindex runs, the demo.

Layer: above ``pipeline`` and ``index`` (which it wires together, setting resources where Ray Data / Ray Train
are wired), below ``jobs`` and ``bench`` (which parse flags and call one function here).
"""
