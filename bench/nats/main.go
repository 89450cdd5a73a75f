// End-to-end latency of NATS JetStream at a steady rate, for bench/compare: one connection
// publishes RATE messages per second (asynchronously, paced every millisecond) for SECONDS to
// a file-backed stream, each payload stamped with its send time (first 8 bytes, Unix ns); a
// consumer created at the stream's end before the first publish (AckAll, acknowledged every
// 256 messages) records receive time minus send time. Prints one JSON object: sent, received,
// seconds (first publish to last receipt), measured (after warm-up), errors, latency quantiles in ms (p50, p99, p999, max, and a CDF).
//
// Messages sent in the first -warmup seconds are received but left out of the latencies.
//
//	nats-e2e -server URL -rate 50000 -seconds 30 -warmup 5 -size 100 -replicas 1
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func main() {
	server := flag.String("server", nats.DefaultURL, "NATS server URL")
	rate := flag.Int("rate", 50000, "messages per second")
	seconds := flag.Float64("seconds", 30, "how long to publish")
	warmup := flag.Float64("warmup", 0, "seconds at the start whose messages are not measured")
	size := flag.Int("size", 100, "bytes per message (at least 8)")
	replicas := flag.Int("replicas", 1, "replicas of the stream")
	flag.Parse()
	if *size < 8 {
		*size = 8
	}
	total := int(float64(*rate) * *seconds)
	if err := run(*server, *rate, total, *size, *replicas, time.Duration(*warmup*1e9)); err != nil {
		fmt.Fprintln(os.Stderr, "nats-e2e:", err)
		os.Exit(1)
	}
}

func run(server string, rate, total, size, replicas int, warmup time.Duration) error {
	ctx := context.Background()
	nc, err := nats.Connect(server)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		return err
	}
	stream, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: "e2e", Subjects: []string{"e2e.m"}, Storage: jetstream.FileStorage, Replicas: replicas,
	})
	if err != nil {
		return err
	}
	cons, err := stream.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
		Durable: "e2e", AckPolicy: jetstream.AckAllPolicy, DeliverPolicy: jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return err
	}
	micros := make([]int64, 0, total)
	received := 0
	measuredFrom := time.Now().Add(warmup).UnixNano()
	var mu sync.Mutex
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		now := time.Now().UnixNano()
		data := msg.Data()
		mu.Lock()
		if len(data) >= 8 && received < total {
			received++
			if sentAt := int64(binary.LittleEndian.Uint64(data)); sentAt >= measuredFrom {
				micros = append(micros, (now-sentAt)/1000)
			}
			if received%256 == 0 || received == total {
				_ = msg.Ack()
			}
		}
		mu.Unlock()
		last.Store(now)
	})
	if err != nil {
		return err
	}
	defer cc.Stop()

	var errors atomic.Int64
	perMs := float64(rate) / 1000
	started := time.Now()
	sent, published := 0, 0
	deadline := started.Add(time.Duration(float64(total) / float64(rate) * 1e9))
	// Sends stop at the deadline even when publishing fell behind the rate (PublishAsync
	// waits while 4096 are unacknowledged): what was sent is measured.
	for sent < total && time.Now().Before(deadline) {
		elapsed := float64(time.Since(started).Nanoseconds()) / 1e6
		due := int((elapsed + 1) * perMs)
		if due > total {
			due = total
		}
		for ; sent < due; sent++ {
			payload := make([]byte, size)
			binary.LittleEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
			if _, err := js.PublishAsync("e2e.m", payload); err != nil {
				errors.Add(1)
			} else {
				published++
			}
		}
		next := started.Add(time.Duration((math.Floor(elapsed) + 1) * 1e6))
		time.Sleep(time.Until(next))
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
	}
	// Until every message sent is received, or none arrived for 10 s.
	for {
		mu.Lock()
		all := received >= published
		mu.Unlock()
		if all || time.Now().UnixNano()-last.Load() >= int64(10*time.Second) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	got := append([]int64(nil), micros...)
	gotAll := received
	mu.Unlock()
	sort.Slice(got, func(i, j int) bool { return got[i] < got[j] })
	q := func(p float64) float64 {
		if len(got) == 0 {
			return math.NaN()
		}
		i := int(math.Min(float64(len(got)-1), math.Max(0, math.Ceil(p*float64(len(got)))-1)))
		return float64(got[i]) / 1000
	}
	cdf := map[string]float64{}
	for _, p := range []float64{0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1} {
		cdf[fmt.Sprint(p)] = q(p)
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"sent": published, "received": gotAll, "seconds": float64(last.Load()-started.UnixNano()) / 1e9, "measured": len(got), "errors": errors.Load(),
		"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": q(1), "quantiles": cdf,
	})
}
