// Package mastertarget will write Azure-side changes back to on-premises
// disks during failback. Not built yet; see the open issues.
package mastertarget
