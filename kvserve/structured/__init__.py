"""Structured output: grammar-constrained decoding (JSON Schema, regex, choice, Lark/GBNF) on llguidance.

Only the torch- and llguidance-free request side is imported here; the engine imports the manager itself.
"""

from kvserve.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
