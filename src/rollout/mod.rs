//! The automatic rollout: trigger verdicts over the stats windows ([`verdict`]), the
//! statistics behind them ([`statistics`]), the step plan's decisions ([`plan`]) and the
//! replication-lag guardrail ([`lag`]). The controller runs them at each evaluation and applies
//! what they decide, as it applies an operator's commands.

pub mod lag;
pub mod plan;
pub mod statistics;
pub mod verdict;
