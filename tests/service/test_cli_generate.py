"""`colocate generate`: token from the flag or COLOCATE_TOKEN; errors print the
status code and message and exit non-zero. (Streaming real text is tested in
test_end_to_end.py, which has a tokenizer.)"""
from __future__ import annotations

import pytest

from colocate.cli import build_parser, main
from tests.service.conftest import TOKEN


def run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_documents_the_token_variable():
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert "COLOCATE_TOKEN" in sub.format_help()


def test_without_a_token_it_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("COLOCATE_TOKEN", raising=False)
    code, _, err = run(capsys, ["generate", "--target", "127.0.0.1:1", "hi"])
    assert code == 2 and "COLOCATE_TOKEN" in err


@pytest.mark.parametrize("token_from", ["flag", "env"])
def test_a_wrong_token_prints_the_status_and_exits_1(make_service, capsys, monkeypatch,
                                                       token_from):
    target = make_service().server.target
    argv = ["generate", "--target", target, "hi"]
    if token_from == "flag":
        argv[1:1] = ["--token", "not-a-tenant"]
    else:
        monkeypatch.setenv("COLOCATE_TOKEN", "not-a-tenant")
    code, out, err = run(capsys, argv)
    assert code == 1 and out == ""
    assert err.startswith("error: UNAUTHENTICATED: ") and "not-a-tenant" not in err


def test_an_invalid_field_names_it(make_service, capsys):
    target = make_service().server.target
    code, _, err = run(capsys, ["generate", "--target", target, "--token", TOKEN,
                                "--temperature", "-1", "hi"])
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: ") and "temperature" in err


def test_an_unreachable_target_exits_1(capsys):
    code, _, err = run(capsys, ["generate", "--target", "127.0.0.1:1", "--token", TOKEN,
                                "--timeout", "2", "hi"])
    assert code == 1 and err.startswith("error: UNAVAILABLE")
