"""Shared runtime plumbing under every stage: the Ray connection, progress and summary printing, and the
error policy that separates named input failures (recorded and skipped) from bugs (raised).

This package is the bottom layer: it imports no other project package.
"""
