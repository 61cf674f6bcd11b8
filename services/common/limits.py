"""The public limits on what a request may ask for, each defined once.

The gateway refuses a value past a limit where the field enters (validation.py,
naming the field); the tokenizer and the engine check again what would hurt
them, since clients may reach them without the gateway. The protos document
the same values.
"""

from __future__ import annotations

# Stop strings per request. The detokenizer searches the pending text for each
# of them on every step, so the count multiplies that per-token work; 16 is
# four times the 4 OpenAI accepts.
MAX_STOP_STRINGS = 16

# Characters per stop string. The detokenizer holds back up to this many
# characters minus one while a stop string may be starting, which delays
# streamed text by as much; 256 fits any delimiter or line used as a stop.
MAX_STOP_STRING_CHARS = 256

# Stop token ids per request. The engine looks every sampled token up in them
# on every step; 64 is far past the few end-of-turn ids a chat template uses.
MAX_STOP_TOKEN_IDS = 64

# Bytes of a structured-output constraint's text: a JSON schema, a regex, an
# EBNF grammar, or the choices together. The tokenizer service compiles it
# while the request waits, and compile time and the compiled grammar (sent
# with the request to the engine) grow with it; 64 KiB holds schemas of
# hundreds of properties.
MAX_CONSTRAINT_BYTES = 64 * 1024

# Strings of a `choice` constraint: each is one alternative of the grammar
# the engine walks at every step.
MAX_CHOICES = 256

# Tools a chat may offer. Their descriptions and parameter schemas together
# have at most MAX_CONSTRAINT_BYTES: a call's arguments are compiled from
# them, and the chat template renders all of them into the prompt.
MAX_TOOLS = 128

# Compiled grammars the tokenizer service keeps, by bytes of their
# serialized form: a client that repeats its schema (the common case) pays
# for compiling it once.
GRAMMAR_CACHE_BYTES = 256 * 1024 * 1024

# Most likely alternatives returned per output token with logprobs: OpenAI's
# maximum, and each of them is one more token text for the gateway to fetch.
MAX_LOGPROBS = 20

# Completions per prompt (n). Each is a sequence of its own in the engine
# (sharing the prompt's cached KV blocks) and counts against
# --max-concurrent-requests; OpenAI allows 128, 16 covers sampling several
# candidates without one request taking a batch.
MAX_N = 16

# Prompts of one /v1/completions request (a list of strings or of token-id
# lists), each run n times: a batch of prompts in one body, bounded like n.
MAX_PROMPTS = 16

# Output tokens one request may ask for over all its completions: n (times
# the prompts) times max_tokens, or max_model_len where max_tokens is unset.
# 256 Ki is 16 completions of 16 Ki tokens; past it a request holds the
# engine for minutes and should set a smaller max_tokens.
MAX_TOTAL_OUTPUT_TOKENS = 256 * 1024

# logit_bias: at most this many token ids (OpenAI's bound), each biased by at
# most MAX_LOGIT_BIAS either way. The sampler adds a [rows, vocab] bias
# tensor built from them every step.
MAX_LOGIT_BIAS_TOKENS = 300
MAX_LOGIT_BIAS = 100.0

# Output tokens every request is given room for: max_tokens may not be lower,
# and a prompt must be at least this much shorter than max_model_len.
MIN_OUTPUT_TOKENS = 1

# Highest sampling temperature. Far above it the distribution is as good as
# uniform, so a larger value is a mistake (a percentage, a unit mix-up).
MAX_TEMPERATURE = 100.0

# presence_penalty and frequency_penalty lie in [-MAX_PENALTY, MAX_PENALTY]:
# OpenAI's range, so that clients written for it send the same values here.
MAX_PENALTY = 2.0

# Longest timeout a request may set, in seconds. A day is far past any
# generation a client waits for, and it keeps deadline arithmetic in range (a
# Duration of 10**15 s overflows a timedelta).
MAX_TIMEOUT_S = 24 * 60 * 60

# Most UTF-8 bytes one token stands for, special tokens included: a bound on
# every vocabulary served (SmolLM2's longest token has 81 bytes, a newline and
# 80 spaces; runs of spaces, dashes or '#' are the longest in common
# vocabularies). A prompt of more characters than max_model_len times this
# cannot fit, and is refused before it is tokenized.
MAX_TOKEN_BYTES = 128

# Most bytes one UTF-8 byte of text takes in a JSON string: a control byte
# written as a \u00XX escape. Other escapes take less per byte (a character
# outside the BMP is 4 bytes of UTF-8 and 12 of escapes).
MAX_JSON_BYTES_PER_TEXT_BYTE = 6

# What a REST body holds besides its prompt: stop strings (16 of 256
# characters, escaped), stop_token_ids, sampling fields and JSON punctuation,
# and a response_format or tools of up to MAX_CONSTRAINT_BYTES, escaped.
REST_BODY_OVERHEAD_BYTES = 64 * 1024 + MAX_CONSTRAINT_BYTES * MAX_JSON_BYTES_PER_TEXT_BYTE


def max_prompt_chars(max_model_len: int) -> int:
    """Characters past which a prompt (text, or a chat's contents together)
    cannot fit max_model_len tokens."""
    return max_model_len * MAX_TOKEN_BYTES


def max_rest_body_bytes(max_model_len: int) -> int:
    """The largest REST body a request to a model of max_model_len can need:
    its longest possible prompt, escaped at the worst, plus the other fields.
    A prompt of token ids takes at most 12 bytes per id ("4294967295, ")."""
    return max_prompt_chars(max_model_len) * MAX_JSON_BYTES_PER_TEXT_BYTE + REST_BODY_OVERHEAD_BYTES


# Default of the gateway's --max-buffered-output-bytes: output of one request
# that its client has not read yet (chunks waiting for the client's stream to
# take them). Past it the request is aborted: a client that stops reading
# must not make the gateway hold its output without bound. 4 MiB is minutes
# of output with logprobs at the speed of any reader; the gateway uses at
# most half of --max-message-bytes, so that a chunk always fits a message.
DEFAULT_MAX_BUFFERED_OUTPUT_BYTES = 4 * 1024 * 1024

# Default of the gateway's --client-read-timeout-s: how long a request's
# oldest unread output may wait for its client before the request is
# aborted and its KV blocks freed.
DEFAULT_CLIENT_READ_TIMEOUT_S = 30.0


# Default of --max-message-bytes: the largest gRPC message every service
# accepts or sends, and the largest REST body the gateway reads (less when
# max_rest_body_bytes of the models served is less), so that a request too
# large for one door is too large for the other. 64 MiB holds a
# prompt of millions of characters, or an engine step's updates for a full
# batch with logprobs.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
