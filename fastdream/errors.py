# SPDX-License-Identifier: Apache-2.0
"""Errors that the CLI turns into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""
