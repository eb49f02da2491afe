"""Benchmarks: offline engine speed, a serving load generator for any OpenAI-compatible endpoint,
peers started by the suite itself (llama.cpp, HF transformers), cost per token, and reports.

Figures are written as JSON under benchmarks/results/; `zili bench report` turns every file there
into BENCHMARKS.md tables and PNG plots.
"""
