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

A field left off the command line (`click_options(cls, exclude=...)`) is a setting of the Python API only.
`order_options` lists a command's settings among its other options in --help. Values are checked in the
dataclass's `__post_init__` (`check_min`, `check_choices`), so the command line and the API share the checks,
with errors that name the flag.
"""
import dataclasses
import math

import click


def setting(default, help: str | None = None, flag: str | tuple | None = None, choices: tuple | None = None,
            **click_kw):
    """A dataclass field with the help text (and any extra click.option arguments) of its flag.

    `flag`: only where the flag cannot be the field's name alone (a switch whose off side is not `--no-<name>`,
    such as `--eval-mpc/--eval-policy`; a tuple keeps an older spelling working beside the field's).
    `choices`: the allowed values (a click.Choice; `check_choices` checks them)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                                        "click": click_kw})


def flag_name(name: str) -> str:
    """The flag of the setting `name`: calib_episodes -> --calib-episodes."""
    return "--" + name.replace("_", "-")


def click_options(cls, exclude=()):
    """Decorator: one click option per field of `cls` (but `exclude`), in field order."""
    def decorate(f):
        for fl in reversed(dataclasses.fields(cls)):
            if fl.name in exclude:
                continue
            flag = fl.metadata.get("flag") or flag_name(fl.name)
            kw = {"default": fl.default, "help": fl.metadata.get("help"), **fl.metadata.get("click", {})}
            if fl.metadata.get("choices"):
                kw.setdefault("type", click.Choice(list(fl.metadata["choices"])))
            if isinstance(fl.default, bool):
                flags = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
                f = click.option(flags, fl.name, show_default=True, **kw)(f)
            else:  # a tuple of flags: the first the setting's name, the others what users typed before
                f = click.option(*(flag if isinstance(flag, tuple) else (flag,)), fl.name,
                                 show_default=fl.default is not None, **kw)(f)
        return f
    return decorate


def order_options(*names):
    """Decorator above a click command: its parameters `names` first, in this order (so --help lists them),
    then the others in the order they were declared."""
    def decorate(cmd: click.Command):
        by_name = {p.name: p for p in cmd.params}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"{cmd.name}: no parameter(s) {unknown} to order")
        cmd.params = [by_name[n] for n in names] + [p for p in cmd.params if p.name not in names]
        return cmd
    return decorate


def pop_settings(cls, kwargs: dict):
    """An instance of `cls` from a command's keyword arguments; its fields are removed from `kwargs`."""
    return cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs})


def split_settings(cls, kwargs: dict) -> tuple[dict, dict]:
    """`kwargs` -> (those that name a field of `cls`, the others)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}


def check_min(options, minimum, *names):
    """A one-line ValueError naming the flag unless each setting `names` of `options` is a finite number >=
    `minimum` (NaN is not)."""
    for name in names:
        value = getattr(options, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
            raise ValueError(f"{flag_name(name)} must be at least {minimum}, got {value!r}")


def check_choices(options):
    """A one-line ValueError naming the flag for a setting of `options` outside its `choices`."""
    for fl in dataclasses.fields(options):
        choices = fl.metadata.get("choices")
        if choices and getattr(options, fl.name) not in choices:
            raise ValueError(f"{flag_name(fl.name)} must be one of {', '.join(map(str, choices))}, got "
                             f"{getattr(options, fl.name)!r}")
