"""Model directories for tests: the embedded model's tokenizer with a chat
template of the test's choosing, which a tokenizer service loads in about a
second (the embedded GGUF takes many)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# SmolLM2's ChatML, behind the checks of Llama-2 and Mistral templates: a
# system turn only first, then user and assistant turns alternating, user
# first. A chat the checks pass renders exactly as SmolLM2's own template
# renders it.
STRICT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('The system role is only supported as the first message') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set turns = messages[1:] if messages[0]['role'] == 'system' else messages %}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_directory(target: Path, tokenizer: Any, chat_template: str) -> Path:
    """A HF model directory at `target` holding `tokenizer` (a transformers
    tokenizer) with `chat_template`: enough for a tokenizer service."""
    tokenizer.save_pretrained(target)
    (target / "chat_template.jinja").write_text(chat_template)
    # resolve_model takes a directory with a config.json for a HF model.
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return target
