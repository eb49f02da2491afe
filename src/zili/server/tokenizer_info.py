"""`GET /tokenizer_info`: what a client needs to tokenize the way the served model does.

vLLM's endpoint of the same name (`--enable-tokenizer-info-endpoint`) is what lm-evaluation-harness's
`tokenizer_backend=remote` reads (lm_eval.utils.RemoteTokenizer): the special tokens as strings
(`bos_token`, `eos_token`, `pad_token`, which it then sends to /tokenize for their ids) and the
`chat_template` it renders itself. zili adds the ids and sizes it already knows.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from zili.server.auth import require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


class TokenizerInfo(BaseModel):
    tokenizer_class: str = "PreTrainedTokenizerFast"  # what transformers would build from the same file
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    vocab_size: int
    model_max_length: int


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(request: Request) -> TokenizerInfo:
    """The served tokenizer's special tokens, chat template, vocabulary size and context length."""
    state = request.app.state.zili
    state.ready_engine()
    tok = state.tokenizer
    return TokenizerInfo(bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                         unk_token=tok.unk_token, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, chat_template=tok.chat_template,
                         vocab_size=state.vocab_size, model_max_length=state.max_model_len)
