"""Chat templates without a model: where they are read from, how they render (as
transformers renders them), the end-of-turn token, and messages they refuse."""
from __future__ import annotations

import json
import shutil

import pytest

from colocate.model.chat_template import ChatTemplate, ChatTemplateError
from colocate.model.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
          "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_renders_like_hf_with_trim_and_special_tokens():
    source = ("{{ bos_token }}{% for m in messages %}\n  {{ m['role'] }}: {{ m['content'] }}\n"
              "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    t = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"})
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one
    assert t.render(msgs) == "<s>  user: hi\n  assistant: yo\nassistant:"
    assert t.render(msgs, add_generation_prompt=False) == "<s>  user: hi\n  assistant: yo\n"


def test_raise_exception_and_bad_messages():
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                     "{% endif %}ok", {})
    with pytest.raises(ChatTemplateError, match="user first"):
        t.render([{"role": "system", "content": "x"}])
    for bad, match in [([], "non-empty list"), ("hi", "non-empty list"),
                       ([{"content": "x"}], r"messages\[0\]\.role"),
                       ([{"role": "user"}], r"messages\[0\] has no 'content'"),
                       (["hi"], r"messages\[0\] must be a dict")]:
        with pytest.raises(ValueError, match=match):
            t.render(bad)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}", {}).render([{"role": "user", "content": "x"}])


def test_hf_checkpoint_templates_and_end_of_turn(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    assert Tokenizer.from_pretrained(ckpt).chat_template is None
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text()) if (
        ckpt / "tokenizer_config.json").exists() else {}
    cfg.update(chat_template=[{"name": "default", "template": CHATML}],
               eos_token={"content": "</s>"})
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(ckpt)
    assert tok.chat_template.source == CHATML
    assert tok.chat_template.special_tokens["eos_token"] == "</s>"
    # chat_template.jinja wins over tokenizer_config.json, as in transformers
    (ckpt / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = Tokenizer.from_pretrained(ckpt)
    assert tok.chat_template.render([{"role": "user", "content": "abc"}]) == "abc"
    assert ChatTemplate(CHATML, {}).end_of_turn_tokens({"<|im_end|>": 7}) == (7,)
    assert ChatTemplate(CHATML, {}).end_of_turn_tokens({}) == ()
