"""Reading results for people: terminal tables of a batch's jobs and latency, and latency
over time from periodic benchmarks.

Reads through ``scheduler`` and ``models``; nothing in the library imports it.
"""
