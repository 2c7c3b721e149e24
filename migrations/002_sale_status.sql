-- A sale's status as the API derives it, readable from Postgres alone. The window moves a sale
-- along by itself (no cron writes 'live' or 'ended'), so the status is computed from the persisted
-- window, the last ops state and the persisted reservations, by the rules of sales.sale_status:
-- ended (by ops or by its window) > sold_out (every unit confirmed) > scheduled > paused > live.
-- Holds reach Postgres asynchronously, so this view trails Redis by the queue's lag.
CREATE VIEW sale_status AS
SELECT s.id,
       CASE
           WHEN s.state = 'ended' OR now() >= s.ends_at THEN 'ended'
           WHEN EXISTS (SELECT 1 FROM items i WHERE i.sale_id = s.id)
                AND NOT EXISTS (
                    SELECT 1 FROM items i
                    WHERE i.sale_id = s.id
                      AND i.stock_total > (SELECT coalesce(sum(r.quantity), 0) FROM reservations r
                                           WHERE r.sale_id = i.sale_id AND r.sku = i.sku
                                             AND r.status = 'confirmed'))
               THEN 'sold_out'
           WHEN now() < s.starts_at THEN 'scheduled'
           WHEN s.state = 'paused' THEN 'paused'
           ELSE 'live'
       END AS status
FROM sales s;
