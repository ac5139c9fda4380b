"""LangChain tools over the worker tasks, and Mini-Gemini as a LangChain chat model.

    from mgmflow.tools import MGMChatModel, make_tools
"""

from mgmflow.tools.chat_model import MGMChatModel
from mgmflow.tools.tasks import make_tools

__all__ = ["MGMChatModel", "make_tools"]
