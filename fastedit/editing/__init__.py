"""Editing: requests, keys, values (v*), the closed-form update rules, and reversible patches."""
