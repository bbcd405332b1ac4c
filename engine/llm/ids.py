"""The unified id space: one integer per fed LLM input, shared by the torch and vLLM backends.

speech token s (0..6563) -> s; sos (llm_embedding row 0) -> 6564; task_id (row 1) -> 6565;
text token t -> 6566 + t. (golden README §4, vllm-0.26.md §2.)
"""
from __future__ import annotations

NUM_SPEECH_CLASSES = 6564        # 6561 codes + eos 6561, eos2 6562, fill 6563
EOS = 6561
FILL = 6563
STOP_IDS = (6561, 6562, 6563)
SOS_ID = 6564
TASK_ID = 6565
TEXT_OFFSET = 6566


def text_to_unified(ids: list[int]) -> list[int]:
    return [TEXT_OFFSET + t for t in ids]


def prefix_unified_ids(prompt_text_ids: list[int], text_ids: list[int],
                       prompt_speech_tokens: list[int]) -> list[int]:
    """``[sos] + prompt_text + text + [task_id] + prompt_speech`` in unified ids."""
    return [SOS_ID, *text_to_unified(prompt_text_ids), *text_to_unified(text_ids), TASK_ID,
            *prompt_speech_tokens]
