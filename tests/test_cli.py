"""The command line as a whole: every option documented, an example per command, one version."""

import typer.main

from calofm.cli import app


def commands(group, prefix=""):
    for name, sub in group.commands.items():
        if hasattr(sub, "commands"):
            yield from commands(sub, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", sub


def test_every_option_has_help_and_every_command_an_example():
    found = dict(commands(typer.main.get_command(app)))
    assert {"pretrain", "distill", "adapt", "generate", "evaluate", "export", "push", "data synth"} <= set(found)
    for name, cmd in found.items():
        assert "Example: calofm " in (cmd.help or ""), name
        for param in cmd.params:
            assert getattr(param, "help", None), f"calofm {name}: {param.name} has no help"


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    import calofm

    assert version("calofm") == calofm.__version__


def test_generate_batch_default_is_the_librarys():
    from calofm.generate import DEFAULT_BATCH

    cmd = dict(commands(typer.main.get_command(app)))["generate"]
    assert next(p.default for p in cmd.params if p.name == "batch_size") == DEFAULT_BATCH
