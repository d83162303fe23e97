-- The per-event detector (issue 19): which score p_adversarial is, the attack family,
-- and the detector's features version. Rows written before this migration keep the
-- defaults: score_kind 'classifier' (the output-only forest), family and version empty.
ALTER TABLE attack_labels ADD COLUMN family String DEFAULT '';
ALTER TABLE attack_labels ADD COLUMN score_kind String DEFAULT 'classifier';
ALTER TABLE attack_labels ADD COLUMN features_version String DEFAULT '';
