"""`jaxlm COMMAND`: one module per command, each of the same form.

    NAME, HELP, DESCRIPTION    the command's name, its line in `jaxlm --help`, its --help text
    NEEDS                      the flags that must be given (checked by jaxlm.cli before `run`)
    add_flags(parser) -> None  adds the command's flags
    run(args, overrides) -> int
        the command; `overrides` are the --config.FIELD=VALUE pairs, the result is the exit code.

jaxlm.cli builds each parser (`common.add_parser`: --help shows defaults) and lists the modules
in the order `jaxlm --help` shows them. Flags several commands share (a run's checkpoint,
multi-host start-up, a recipe) are in `common`. Nothing else in jaxlm imports this package:
commands call the library, never the other way round.
"""
