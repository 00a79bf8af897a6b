"""Outputs: machine formats and config readers, Rich tables, figures, the HTML report.

They render what they are handed; every decision is made before them.
"""
