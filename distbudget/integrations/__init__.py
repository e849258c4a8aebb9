"""Budgeted LLM clients: ``openai``, ``anthropic``, ``litellm`` and ``langchain``, each an optional extra
(``pip install 'distbudget[openai]'``). Import the submodule of the SDK you use; this package imports
none of them."""
