"""Tool calling: tools in the prompt (prompt.py), calls out of the reply (parser.py), tool_choice (choice.py)."""
