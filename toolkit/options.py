"""Settings dataclasses as click options: each setting has one name, one default and one help text, from the
command-line flag (`calib_episodes` is `--calib-episodes`) to the function that takes it and the report that
records it.

    @dataclass(frozen=True)
    class CompileOptions:
        calib_episodes: int = setting(6, "closed-loop episodes for int8 calibration")

    @click.command()
    @click_options(CompileOptions)
    def compile_cmd(**kw):
        options = pop_settings(CompileOptions, kw)
"""
import dataclasses

import click


def setting(default, help: str, **click_kw):
    """A dataclass field with the help text (and any extra click.option arguments) of its flag."""
    return dataclasses.field(default=default, metadata={"help": help, "click": click_kw})


def click_options(cls, exclude=()):
    """Decorator: one click option per field of `cls` (but `exclude`), in field order."""
    def decorate(f):
        for fl in reversed(dataclasses.fields(cls)):
            if fl.name in exclude:
                continue
            flag = "--" + fl.name.replace("_", "-")
            kw = {"default": fl.default, "help": fl.metadata.get("help"), **fl.metadata.get("click", {})}
            if isinstance(fl.default, bool):
                f = click.option(f"{flag}/--no-{flag[2:]}", fl.name, show_default=True, **kw)(f)
            else:
                f = click.option(flag, fl.name, show_default=fl.default is not None, **kw)(f)
        return f
    return decorate


def pop_settings(cls, kwargs: dict):
    """An instance of `cls` from a command's keyword arguments; its fields are removed from `kwargs`."""
    return cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs})
