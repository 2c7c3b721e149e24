-- Client budgets (per client ip and device, and attempts per ip a second), so that flashsale
-- recover loads a sale lost in Redis with them.
ALTER TABLE items ADD COLUMN per_ip_limit integer CHECK (per_ip_limit >= 1);
ALTER TABLE items ADD COLUMN per_device_limit integer CHECK (per_device_limit >= 1);
ALTER TABLE sales ADD COLUMN ip_rate_per_s integer CHECK (ip_rate_per_s >= 1);
