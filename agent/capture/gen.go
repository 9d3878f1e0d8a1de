// Package capture loads the eBPF write-capture programs and turns the ring
// buffer into a stream of change records.
package capture

//go:generate go tool bpf2go -tags linux -target amd64 -type lb_record -type lb_dev -type lb_devstate -type lb_counters -type lb_global -type lb_pending -type lb_bucket -type lb_flight capture ../../bpf/capture.bpf.c -- -I../../bpf/include -I../../bpf -D__TARGET_ARCH_x86 -Wall -Werror
