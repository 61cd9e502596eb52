-- The orders service's one table. Idempotent: orders.schema.create_schema runs it at every start of
-- the tests and may be run again on a database that has it.
CREATE TABLE IF NOT EXISTS orders (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          text        NOT NULL,
    -- The client's key for "this order": a retried create finds the first one (ALREADY_EXISTS).
    idempotency_key text        NOT NULL,
    item            text        NOT NULL,
    quantity        integer     NOT NULL CHECK (quantity > 0),
    status          text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'shipped', 'cancelled')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, idempotency_key)
);

-- Keyset paging lists one tenant's orders by id: (tenant, id) serves "WHERE tenant = $1 AND id > $2
-- ORDER BY id LIMIT $3" from the index alone, however deep the page.
CREATE INDEX IF NOT EXISTS orders_tenant_id ON orders (tenant, id);
