// Package configserver will be the control plane: enrollment and mTLS
// certificates, inventory, policies, protection state, RPO and health,
// failover and failback orders, and the dashboard. Not built yet; see the
// open issues.
package configserver
