"""`chat_template`: a template given as text or as a file replaces the model's; anything else is refused."""

import pytest

from kvserve import LLM, SamplingParams
from kvserve.inputs import read_chat_template

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}>{% endif %}")


def test_a_template_file_replaces_the_models(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    llm = LLM(chat_template=str(path), kv_cache_memory="64MiB", show_progress=False)
    output = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2, temperature=0))[0]
    assert output.prompt_token_ids == llm.get_tokenizer()("<user>Hi>", add_special_tokens=False).input_ids


def test_template_text_is_taken_as_it_is_and_other_strings_are_refused(tmp_path):
    assert read_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
