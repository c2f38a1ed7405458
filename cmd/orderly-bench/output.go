package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
)

// printRun prints what one run measured, as progress.
func (b *bencher) printRun(res *benchResult) {
	if res.OtherKeys != nil {
		b.printf("   orderly   the other keys' %d messages in %.2fs (assignment to their last request) = %.0f msg/s", res.OtherKeys.Others, res.Seconds, res.Throughput)
	} else if res.Instances > 1 {
		b.printf("   orderly   %d messages in %.2fs (first produce to last request, %d instances) = %.0f msg/s", res.Messages, res.Seconds, res.Instances, res.Throughput)
	} else {
		b.printf("   orderly   %d messages in %.2fs (assignment to last request) = %.0f msg/s", res.Messages, res.Seconds, res.Throughput)
	}
	if res.Ratio > 0 {
		b.printf(", %.2f of the ceiling", res.Ratio)
		if res.CeilingAfter > 0 {
			b.printf(" (mean of %.0f before and %.0f after)", res.CeilingBefore, res.CeilingAfter)
		}
	}
	if res.Instances > 1 {
		b.printf("; group settled after %.0fms, first request %.1fms after the first produce", res.StartupMS, res.FirstRequestMS)
	} else {
		b.printf("; assignment after %.0fms, first request %.1fms later", res.StartupMS, res.FirstRequestMS)
	}
	b.printf("; sink concurrency max %d\n", res.SinkMaxInFlow)
	if res.LatencyBound > 0 && res.BoundRatio > 0 {
		b.printf("             latency bound min(keys, partitions x max_in_flight, max_conns)/(latency x requests) = %.0f msg/s: ratio %.2f\n", res.LatencyBound, res.BoundRatio)
	}
	b.printf("             dispatch latency (assignment to request received) p50 %.1fms p99 %.1fms", res.DispatchP50MS, res.DispatchP99MS)
	if res.LiveMessages > 0 {
		b.printf("; live e2e (produce to request received, %d messages at %.0f msg/s) p50 %.2fms p99 %.2fms", res.LiveMessages, res.LiveRate, res.LiveP50MS, res.LiveP99MS)
	}
	where := "this process"
	if res.Dispatcher == "process" {
		where = "orderly process"
		b.printf("\n             cpu %.2f s/10k (orderly process) + sink/harness %.2f s/10k", res.CPUPer10k, res.SinkCPUPer10k)
	} else {
		b.printf("\n             cpu %.2f s/10k (this process: orderly, sink and harness)", res.CPUPer10k)
	}
	if res.BrokerCPUPer10k > 0 {
		b.printf(" + broker %.2f s/10k", res.BrokerCPUPer10k)
	}
	switch {
	case res.Dispatcher != "process":
		b.printf("; allocs %.1f/msg", res.AllocsPerMsg)
		if res.CeilingAllocsPerMsg > 0 {
			b.printf(" - ceiling %.1f = beyond the plain client ~%.1f/msg", res.CeilingAllocsPerMsg, res.OwnAllocsPerMsg)
		}
	case res.CeilingAllocsPerReq > 0:
		b.printf("\n             allocs %.1f/msg in the orderly process - net/http client %.1f", res.AllocsPerMsg, res.ClientAllocsPerReq)
		if res.Requests > 1 {
			b.printf("/request x %d", res.Requests)
		}
		b.printf(" = beyond the plain client ~%.1f/msg; sink side %.1f/request (ceiling run %.1f/request: client + sink side)",
			res.OwnAllocsPerMsg, res.SinkAllocsPerReq, res.CeilingAllocsPerReq)
	default:
		b.printf("\n             allocs %.1f/msg in the orderly process; sink side %.1f/request", res.AllocsPerMsg, res.SinkAllocsPerReq)
	}
	b.printf("\n             rss MB (%s): baseline %.0f, steady %.0f, peak %.0f, after %.0f, after FreeOSMemory %.0f (maxrss %.0f)\n             Go heap in use / goroutine stacks / runtime Sys MB: %.0f / %.0f / %.0f at the end of the backlog; heap / stacks %.0f / %.0f after the run and a GC\n",
		where, res.RSSBaselineMB, res.RSSSteadyMB, res.RSSPeakMB, res.RSSAfterMB, res.RSSAfterFreeMB, res.MaxRSSMB,
		res.HeapInUseMB, res.StackInUseMB, res.GoSysMB, res.HeapAfterMB, res.StackAfterMB)
	b.printf("             order: %d violations, %d duplicates, %d missing; %d messages delivered in the backlog window; retries %.0f, pauses %.0f\n",
		res.OrderViolation, res.Duplicates, res.Missing, res.Delivered, res.Retries, res.Pauses)
}

// printHot prints a hot-key run against its comparison run.
func (b *bencher) printHot(res *benchResult) {
	h := res.OtherKeys
	if h == nil {
		return
	}
	b.printf("   hot key   other keys: %.0f msg/s with the hot key, %.0f msg/s without: ratio %.2f, each run against its own ceiling (raw %.2f); those sharing the hot key's partition %d done after %.0fms, the others after %.0fms; hot key delivered %d of %d meanwhile\n",
		h.OthersThroughput, h.WithoutHot, h.Ratio, h.OthersThroughput/max(h.WithoutHot, 1e-9), h.HotPartition, h.OthersSamePartitionMS, h.OthersOtherPartitionMS, h.HotDelivered, hotCount(res.Messages, res.HotKey))
}

// benchDefinitions say how each column of the tables is measured; they
// are printed under the table and included in the JSON output.
var benchDefinitions = map[string]string{
	"msg/s":      "messages delivered / time from the partition assignment (every pre-produced message consumable) to the last request received; hot-key runs: the other keys' messages only",
	"ceiling":    "the best rate of a plain net/http client (same transport tuning) sending the same number of messages' requests to the same sink, over goroutine counts from Orderly's own sending concurrency, min(keys, partitions x max_in_flight, max_conns_per_host when not 0), down to 16 (256, 128, 64, 32, 16); run before and again (at the best count) after Orderly's backlog, the ratio being to the mean of the two (a drifting machine moves both sides); the client runs where Orderly runs: with -dispatcher process in a process of its own (its CPU and allocations then add the sink side's in the bench process), with -dispatcher in-process in the bench process, beside the sink",
	"dispatch":   "per request: from the partition assignment to the request received by the sink (pre-produced backlog: mostly the message's place in it)",
	"live e2e":   "per request of the live phase (messages produced at a steady rate after the backlog, by default a quarter of msg/s for 1s): from the produce timestamp in the event to the request received (includes the producer's linger.ms=5)",
	"cpu s/10k":  "user+system CPU from assignment to the last request, per 10,000 messages, of the Orderly process: with -dispatcher process the child alone (/proc/PID/stat, 10ms ticks), the bench process's (sink, recorder, harness: on 2 cores they compete as two processes do) and the broker child's beside it; with -dispatcher in-process this process (getrusage), sink included and, with -broker in-process, the broker",
	"rss":        "MB of the Orderly process; base: with -dispatcher process the child at start-up, right after its partitions are assigned and a GC (it is already consuming the backlog), with -dispatcher in-process before the dispatcher started, after a GC (with -broker in-process the backlog is in this heap); steady: median of 100ms samples of /proc/PID/statm during the backlog; peak: their largest; after: after the run (and -settle); freed: then after runtime.GC + debug.FreeOSMemory; maxrss: the process's peak (VmHWM of the child; getrusage in-process, the harness included)",
	"transform":  "6-transform: the name events pre-produced to " + transformInput + ", then read, transformed (testkit.HashedValue: key, seq, names, md5 of the event) and produced to another topic by Orderly (one route, one topic request, DLQ on) and by the plain loop (one consume loop feeding a goroutine per input partition, encoding/json and md5, idempotent produce with acks=all not waited for, auto-commit), each in a child process in turn on the same broker, the first alternating over -repeat; msg/s: events / time from the first record of its output topic to the last (the topic's end offsets, polled every 5ms), so that start-up is left out; first record: from the side's partition assignment (every event consumable) to its first record; cpu s: the side's process from the assignment to the last record (broker cpu s: the broker process's over the same time, with -broker process); rss: MB of its process, steady and peak of 100ms samples over the window, maxrss its VmHWM; violations, dup, missing: testkit.HashedCheck of its output topic read back after the run (key, md5 of the event, per-key order); the run fails if a record is missing, out of order, wrong, or if the two topics' values differ",
	"allocs/msg": "runtime.MemStats.Mallocs delta of the Orderly process / messages delivered over the backlog; vs plain: what Orderly allocates per message beyond what the plain net/http client allocates for the same requests (negative: fewer; Orderly's HTTP/1.1 round trips do not go through net/http's Transport, see httpclient/h1.go): with -dispatcher process allocs/msg - the net/http client's per request x requests, the client's per request being the bench process's during the ceiling run (client + sink side) - the bench process's during Orderly's run (sink side and harness only; with -broker in-process the broker too); with -dispatcher in-process allocs/msg - the ceiling run's per message (net/http client and server, the sink; the broker with -broker in-process is counted as Orderly's)",
}

// printBenchTable prints one row per HTTP run and the definitions of the
// columns.
func printBenchTable(w io.Writer, results []*benchResult) {
	if len(results) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\tmessages\tmsg/s\tceiling (goroutines)\tratio\tdispatch p50\tp99\tlive p50\tp99\tcpu s/10k\trss MB base\tsteady\tpeak\tafter\tfreed\tallocs/msg\tvs plain\t")
	for _, r := range results {
		ratio := "-"
		switch {
		case r.Ratio > 0:
			ratio = fmt.Sprintf("%.2f", r.Ratio)
		case r.OtherKeys != nil && r.OtherKeys.Ratio > 0:
			ratio = fmt.Sprintf("%.2f*", r.OtherKeys.Ratio)
		}
		ceiling, own, live50, live99 := "-", "-", "-", "-"
		if r.Ceiling > 0 {
			ceiling = fmt.Sprintf("%.0f (%d)", r.Ceiling, r.CeilingConcurrency)
			own = fmt.Sprintf("%.1f", r.OwnAllocsPerMsg)
		}
		if r.LiveMessages > 0 {
			live50, live99 = fmt.Sprintf("%.1fms", r.LiveP50MS), fmt.Sprintf("%.1fms", r.LiveP99MS)
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%s\t%s\t%.0fms\t%.0fms\t%s\t%s\t%.2f\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t%.1f\t%s\t\n",
			r.Name, r.Messages, r.Throughput, ceiling, ratio, r.DispatchP50MS, r.DispatchP99MS, live50, live99,
			r.CPUPer10k, r.RSSBaselineMB, r.RSSSteadyMB, r.RSSPeakMB, r.RSSAfterMB, r.RSSAfterFreeMB, r.AllocsPerMsg, own)
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, k := range []string{"msg/s", "ceiling", "dispatch", "live e2e", "cpu s/10k", "rss", "allocs/msg"} {
		fmt.Fprintf(w, "  %-10s %s\n", k, benchDefinitions[k])
	}
	for _, r := range results {
		if r.OtherKeys != nil {
			fmt.Fprintf(w, "  %-10s %s: the other keys' msg/s with the hot key / without it (run %s-nohot), each divided by its run's ceiling so that drift between the runs cancels\n", "ratio*", r.Name, r.Name)
		}
	}
}

// printTransformTable prints two rows per transform run, Orderly's and the
// plain loop's, and the definition of the columns.
func printTransformTable(w io.Writer, results []*benchResult) {
	if len(results) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\tmessages\tsystem\tmsg/s\tratio\tfirst record\tcpu s\tcpu s/10k\tbroker cpu s\trss MB steady\tpeak\tmaxrss\tviolations\tdup\tmissing\t")
	for _, r := range results {
		t := r.Transform
		for _, s := range []*transformSide{&t.Orderly, t.Plain} {
			if s == nil {
				continue
			}
			ratio := "-"
			if s == &t.Orderly && t.Ratio > 0 {
				ratio = fmt.Sprintf("%.2f", t.Ratio)
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%.0f\t%s\t%.0fms\t%.2f\t%.2f\t%.2f\t%.0f\t%.0f\t%.0f\t%d\t%d\t%d\t\n", r.Name, r.Messages, s.System,
				s.Throughput, ratio, s.FirstMS, s.CPUSeconds, s.CPUPer10k, s.BrokerCPU, s.RSSSteady, s.RSSPeak, s.MaxRSS, s.Violations, s.Duplicates, s.Missing)
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "\n  %-10s %s\n", "transform", benchDefinitions["transform"])
}

// median returns the median of f over rs.
func median(rs []*benchResult, f func(*benchResult) float64) float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// minMax returns the least and the largest of f over rs.
func minMax(rs []*benchResult, f func(*benchResult) float64) (lo, hi float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, r := range rs {
		lo, hi = min(lo, f(r)), max(hi, f(r))
	}
	return lo, hi
}

// spread returns the median of f over rs with its minimum and maximum, as
// "median (min–max)".
func spread(rs []*benchResult, f func(*benchResult) float64, format string) string {
	lo, hi := minMax(rs, f)
	return fmt.Sprintf(format+" ("+format+"–"+format+")", median(rs, f), lo, hi)
}

// groupRepeats groups repeated runs (named NAME#k) by name, in order.
func groupRepeats(results []*benchResult) (order []string, groups map[string][]*benchResult) {
	groups = map[string][]*benchResult{}
	for _, r := range results {
		name, _, _ := strings.Cut(r.Name, "#")
		if strings.HasSuffix(r.Name, "-nohot") {
			name += "-nohot"
		}
		if groups[name] == nil {
			order = append(order, name)
		}
		groups[name] = append(groups[name], r)
	}
	return order, groups
}

// printTransformMedians summarises repeated transform runs.
func printTransformMedians(w io.Writer, results []*benchResult) {
	if len(results) == 0 {
		return
	}
	fmt.Fprintln(w, "\ntransform: medians (min–max) over the repetitions")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\truns\torderly msg/s\tplain loop msg/s\tratio\tcpu s orderly\tplain\tmaxrss MB orderly\tplain\tviolations orderly\tplain\t")
	plain := func(f func(*transformSide) float64) func(*benchResult) float64 {
		return func(r *benchResult) float64 {
			if r.Transform.Plain == nil {
				return 0
			}
			return f(r.Transform.Plain)
		}
	}
	orderly := func(f func(*transformSide) float64) func(*benchResult) float64 {
		return func(r *benchResult) float64 { return f(&r.Transform.Orderly) }
	}
	rate := func(s *transformSide) float64 { return s.Throughput }
	cpu := func(s *transformSide) float64 { return s.CPUSeconds }
	rss := func(s *transformSide) float64 { return s.MaxRSS }
	order, groups := groupRepeats(results)
	for _, name := range order {
		rs := groups[name]
		var vo, vp int
		for _, r := range rs {
			vo += r.Transform.Orderly.Violations
			if r.Transform.Plain != nil {
				vp += r.Transform.Plain.Violations
			}
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t\n", name, len(rs),
			spread(rs, orderly(rate), "%.0f"), spread(rs, plain(rate), "%.0f"),
			spread(rs, func(r *benchResult) float64 { return r.Transform.Ratio }, "%.2f"),
			spread(rs, orderly(cpu), "%.2f"), spread(rs, plain(cpu), "%.2f"),
			spread(rs, orderly(rss), "%.0f"), spread(rs, plain(rss), "%.0f"), vo, vp)
	}
	tw.Flush()
}

// printBenchMedians summarises repeated HTTP runs: the median of each
// figure over the repetitions.
func printBenchMedians(w io.Writer, results []*benchResult) {
	if len(results) == 0 {
		return
	}
	fmt.Fprintln(w, "\nmedians over the repetitions")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\truns\tmsg/s\tceiling (goroutines)\tratio\tratio min\tmax\tlive p50\tp99\tcpu s/10k\trss steady\tpeak\tallocs/msg\tvs plain\t")
	ratio := func(r *benchResult) float64 {
		if r.OtherKeys != nil {
			return r.OtherKeys.Ratio
		}
		return r.Ratio
	}
	order, groups := groupRepeats(results)
	for _, name := range order {
		rs := groups[name]
		lo, hi := minMax(rs, ratio)
		live50, live99 := "-", "-"
		if rs[0].LiveMessages > 0 {
			live50 = fmt.Sprintf("%.1fms", median(rs, func(r *benchResult) float64 { return r.LiveP50MS }))
			live99 = fmt.Sprintf("%.1fms", median(rs, func(r *benchResult) float64 { return r.LiveP99MS }))
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.0f (%.0f)\t%.2f\t%.2f\t%.2f\t%s\t%s\t%.2f\t%.0f\t%.0f\t%.1f\t%.1f\t\n", name, len(rs),
			median(rs, func(r *benchResult) float64 { return r.Throughput }),
			median(rs, func(r *benchResult) float64 { return r.Ceiling }),
			median(rs, func(r *benchResult) float64 { return float64(r.CeilingConcurrency) }),
			median(rs, ratio), lo, hi, live50, live99,
			median(rs, func(r *benchResult) float64 { return r.CPUPer10k }),
			median(rs, func(r *benchResult) float64 { return r.RSSSteadyMB }),
			median(rs, func(r *benchResult) float64 { return r.RSSPeakMB }),
			median(rs, func(r *benchResult) float64 { return r.AllocsPerMsg }),
			median(rs, func(r *benchResult) float64 { return r.OwnAllocsPerMsg }))
	}
	tw.Flush()
}
