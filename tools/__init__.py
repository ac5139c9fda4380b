"""LangChain tools over the worker tasks, and Mini-Gemini as a LangChain chat model."""
