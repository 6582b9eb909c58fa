"""Chat and text requests on the data-worker side: rendering a model's chat template,
turning decoded media and the rendered text into a `ChatPrompt` for the model, incremental
detokenising and stop strings. The HTTP shapes (OpenAI's) live in `mstar.api_server`."""

from mstar.chat.detokenizer import IncrementalDetokenizer
from mstar.chat.prompt import ChatPrompt, build_chat_prompt
from mstar.chat.stop import StopStrings
from mstar.chat.template import render_chat

__all__ = ["ChatPrompt", "IncrementalDetokenizer", "StopStrings", "build_chat_prompt",
           "render_chat"]
