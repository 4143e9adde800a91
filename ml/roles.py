"""Least-privilege database roles: apply ``ml/roles.sql`` and create login users in a role.

The rules live in ``roles.sql`` (one place, readable by a DBA); this module runs it and manages logins.
``apply_roles`` is idempotent: run it on deploy, and after each dbt build when the warehouse user is not a
superuser (then no event trigger keeps the marts grants up to date during rebuilds).
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
from psycopg import sql

from ml.errors import CrmError

ROLES_FILE = Path(__file__).with_name("roles.sql")
GROUP_ROLES = ("crm_loader", "crm_transformer", "crm_trainer", "marketing_reader")
# Columns nobody but crm_transformer may read in marts (mirrors audit.crm_personal_data_columns()).
PERSONAL_DATA_COLUMNS = ("email", "full_name", "first_name", "last_name", "birth_date", "phone", "address", "street")
_LOGIN_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def apply_roles(conn: psycopg.Connection) -> None:
    """Create the group roles if missing and (re)apply every grant, default privilege and the marts trigger."""
    with conn.transaction():
        conn.execute(ROLES_FILE.read_text())


def create_login(conn: psycopg.Connection, role: str, name: str, password: str) -> None:
    """Create (or update) login ``name`` as a member of group ``role``.

    The login's session runs as the group role (``ALTER ROLE ... SET role``), so tables it creates are owned
    by the group and every member can rebuild them; default privileges are written for the groups.
    """
    if role not in GROUP_ROLES:
        raise CrmError(f"unknown role {role!r}: use one of {', '.join(GROUP_ROLES)}")
    if not isinstance(name, str) or not _LOGIN_NAME.fullmatch(name) or name in GROUP_ROLES:
        raise CrmError(f"invalid login name {name!r}: lower-case letters, digits and underscores, not a group name")
    ident = sql.Identifier(name)
    with conn.transaction():
        exists = conn.execute("select 1 from pg_roles where rolname = %s", [name]).fetchone()
        verb = "alter" if exists else "create"
        conn.execute(sql.SQL(verb + " role {} with login password {}").format(ident, sql.Literal(password)))
        conn.execute(sql.SQL("grant {} to {}").format(sql.Identifier(role), ident))
        conn.execute(sql.SQL("alter role {} set role = {}").format(ident, sql.Literal(role)))


def drop_login(conn: psycopg.Connection, name: str) -> None:
    """Remove a login created by :func:`create_login` (objects it created belong to its group and stay)."""
    if name in GROUP_ROLES:
        raise CrmError(f"{name!r} is a group role, not a login")
    with conn.transaction():
        conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(name)))
