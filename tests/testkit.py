"""Helpers shared by every test directory (``tests/`` is on sys.path through its conftest)."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "a condition",
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def script_mgm_answers(monkeypatch, text: str) -> None:
    """Make the tiny Mini-Gemini presets write ``text``, then end their answer.

    For tests of what is done with an answer of a certain shape (an ``<h>…</h>`` image prompt, say), which a
    random model never writes. Only the logits are steered: prompts, decoding, grammars and parsing stay real.
    Every row of a batch follows the script from the prefill on.
    """
    from transformers import LlamaForCausalLM

    from mgmflow.models.mgm.tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    script = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    forward, steps = LlamaForCausalLM.forward, {}

    def scripted(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        step = 0 if kwargs.get("inputs_embeds") is not None else steps[id(self)] + 1
        steps[id(self)] = step
        output.logits[:, -1, script[min(step, len(script) - 1)]] += 1e4
        return output

    monkeypatch.setattr(LlamaForCausalLM, "forward", scripted)
