"""`kestrel` re-executes itself once with glibc's huge-page tunable set (kestrel/huge_pages.py)."""

from __future__ import annotations

import subprocess
import sys

from kestrel import huge_pages


def test_environment_appends_the_tunable_to_existing_ones():
    assert huge_pages.environment({})["GLIBC_TUNABLES"] == huge_pages.TUNABLE
    env = huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + huge_pages.TUNABLE and env["X"] == "1"
    assert not huge_pages.wanted(env)  # set once: never re-executed again
    assert not huge_pages.wanted({"KESTREL_HUGE_PAGES": "0"})


def test_the_command_runs_with_the_tunable_where_it_is_wanted():
    """The re-executed command sees the tunable (and its own arguments); with KESTREL_HUGE_PAGES=0 it does not."""
    probe = ("import os, sys; from kestrel import huge_pages; wanted = huge_pages.wanted();"
             "huge_pages.reexec_if_wanted(); tunables = os.environ.get('GLIBC_TUNABLES', '');"
             "print(tunables, wanted or 'glibc.malloc.hugetlb' in tunables, sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", probe, "a b", "c"], capture_output=True, text=True, check=True).stdout
    tunables, ran_with_it, argv = out.split(" ", 2)
    assert argv.strip() == "['a b', 'c']"
    assert (huge_pages.TUNABLE in tunables) == (ran_with_it == "True")
    env = {"KESTREL_HUGE_PAGES": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    assert huge_pages.TUNABLE not in out.split(" ", 1)[0]
