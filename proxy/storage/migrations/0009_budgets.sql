-- docs/design.md#budgets: a principal's monthly spend limit, and what it has spent in each month (UTC, by when
-- its requests started), counted by the commit that bills, in the same transaction, for principals with a budget.
CREATE TABLE budgets (
    principal_id text        PRIMARY KEY,
    monthly_usd  numeric     NOT NULL CHECK (monthly_usd >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE budget_spend (
    principal_id text        NOT NULL,
    month        timestamptz NOT NULL,
    spent        numeric     NOT NULL CHECK (spent >= 0),
    PRIMARY KEY (principal_id, month)
);
