"""The CLI's subcommands: each module adds its parser and runs it."""
