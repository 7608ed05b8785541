"""Admins add and remove annotators and admins without a restart: the hashed users file rewritten
atomically (password mode), the allowlist (Hugging Face sign-in), both kept over a restart; called
as the Admin tab calls them, with the real access rules and a real vote store.

    .venv/bin/python -m pytest tests/test_people.py
"""

import stat
from types import SimpleNamespace

import gradio as gr
import pytest

from collector.users import Access, Users, verify
from storage.votes import VoteStore
from ui import admin as admin_ui


def _request(name: str):
    return SimpleNamespace(username=name, session_hash="s", request=None, headers={}, client=None)


def _hf_request(name: str, sub: str, orgs=()):
    return SimpleNamespace(username=None, session_hash="s", headers={}, client=None, request=SimpleNamespace(
        session={"oauth_info": {"userinfo": {"sub": sub, "preferred_username": name,
                                             "orgs": [{"preferred_username": o} for o in orgs]}}}))


@pytest.fixture
def team(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("alice:alice-password\nbob:bob-password\n")
    users = Users.load(path)
    store = VoteStore(tmp_path / "votes.db")
    access = Access("password", store, admins={"alice"}, users=users)
    return SimpleNamespace(path=path, users=users, store=store, access=access,
                           admin=SimpleNamespace(access=access, store=store))


def test_an_admin_adds_a_user_who_can_log_in_at_once_and_the_file_keeps_only_hashes(team):
    message = admin_ui.add_person(team.admin, "carol", "", _request("alice"))
    password = message.split("**")[1]
    assert "shown once" in message
    assert team.users.verify("carol", password)  # the running app's login takes it now
    assert team.access.annotator(_request("carol")) == "carol"
    text = team.path.read_text()
    assert "carol:scrypt$" in text and password not in text and "alice-password" not in text  # hashes only
    assert stat.S_IMODE(team.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in team.path.parent.iterdir() if p.name.startswith(".")) == []  # no temp file left
    again = Users.load(team.path)  # what a restart reads
    assert verify(again.hashes["carol"], password) and verify(again.hashes["alice"], "alice-password")
    with pytest.raises(gr.Error, match="already a user"):
        admin_ui.add_person(team.admin, "carol", "", _request("alice"))
    for bad in ("", "a:b", "x" * 65, "line\nbreak", "#comment", "sep\u2028arator"):
        with pytest.raises(gr.Error, match="1-64 printable"):
            admin_ui.add_person(team.admin, bad, "", _request("alice"))


def test_a_removed_user_loses_their_live_session_and_their_login(team):
    assert team.access.annotator(_request("bob")) == "bob"
    admin_ui.remove_person(team.admin, "bob", _request("alice"))
    with pytest.raises(PermissionError):
        team.access.annotator(_request("bob"))  # a session opened before: refused at its next request
    assert not team.users.verify("bob", "bob-password") and "bob" not in Users.load(team.path).hashes
    with pytest.raises(gr.Error, match="cannot remove yourself"):
        admin_ui.remove_person(team.admin, "alice", _request("alice"))
    # the old session still carries the name: a new person never inherits it (nor its votes)
    with pytest.raises(gr.Error, match="not given out again"):
        admin_ui.add_person(team.admin, "bob", "", _request("alice"))


def test_admin_roles_change_at_once_outlive_a_restart_and_cannot_lock_everyone_out(team):
    with pytest.raises(PermissionError):
        team.access.admin(_request("bob"))
    admin_ui.set_admin_role(team.admin, "bob", True, _request("alice"))
    assert team.access.admin(_request("bob")).name == "bob"
    restarted = Access("password", team.store, admins={"alice"}, users=Users.load(team.path))  # the same flags
    assert restarted.admin(_request("bob")).name == "bob"
    with pytest.raises(gr.Error, match="your own admin role"):
        admin_ui.set_admin_role(team.admin, "alice", False, _request("alice"))
    with pytest.raises(gr.Error, match="is an admin"):
        admin_ui.remove_person(team.admin, "bob", _request("alice"))
    with pytest.raises(gr.Error, match="when the app started"):  # the operator's admin stays: no lockout
        admin_ui.set_admin_role(team.admin, "alice", False, _request("bob"))
    admin_ui.set_admin_role(team.admin, "bob", False, _request("alice"))
    with pytest.raises(PermissionError):
        team.access.admin(_request("bob"))
    assert team.access.admin(_request("alice")).name == "alice"
    with pytest.raises(gr.Error, match="not a user"):
        admin_ui.set_admin_role(team.admin, "mallory", True, _request("alice"))


def test_a_non_admin_changes_nobody(team):
    before = team.path.read_text()
    for action in (lambda: admin_ui.add_person(team.admin, "mallory", "", _request("bob")),
                   lambda: admin_ui.remove_person(team.admin, "alice", _request("bob")),
                   lambda: admin_ui.set_admin_role(team.admin, "bob", True, _request("bob"))):
        with pytest.raises(gr.Error):
            action()
    assert team.path.read_text() == before and team.access.admins == {"alice"}


def test_on_a_space_the_list_of_annotators_changes_at_once_and_outlives_a_restart(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    access = Access("hf", store, admins={"me"}, annotators="amy")
    admin = SimpleNamespace(access=access, store=store)
    me = _hf_request("me", "sub-me")
    zoe, acme = _hf_request("zoe", "sub-zoe"), _hf_request("kim", "sub-kim", orgs=["acme"])
    for person in (zoe, acme):
        with pytest.raises(PermissionError):
            access.annotator(person)
    admin_ui.add_person(admin, "zoe", None, me)
    admin_ui.add_person(admin, "org: acme", None, me)  # spaces as typed
    assert access.annotator(zoe) == "hf:sub-zoe" and access.annotator(acme) == "hf:sub-kim"
    restarted = Access("hf", store, admins={"me"}, annotators="amy")
    assert restarted.annotator(zoe) == "hf:sub-zoe" and restarted.annotator(acme) == "hf:sub-kim"
    admin_ui.remove_person(admin, "org:acme", me)
    with pytest.raises(PermissionError):
        access.annotator(acme)
    with pytest.raises(gr.Error, match="not on the list"):
        admin_ui.remove_person(admin, "nobody", me)
