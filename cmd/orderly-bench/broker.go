package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/orderly-dispatch/orderly/internal/embedded"
)

// benchTopics are the topics of the bench broker: the HTTP scenarios' and
// the transform scenario's (an idle topic costs the broker nothing).
var benchTopics = []string{benchTopic, transformInput, transformOutput, transformPlainOutput, transformDLQ}

// startBenchBroker starts the embedded broker with the bench topics.
func startBenchBroker(partitions int) (*embedded.Broker, error) {
	return embedded.Start(embedded.Options{Listen: "127.0.0.1:0", Partitions: partitions,
		Topics: benchTopics, MinSessionTimeout: time.Second})
}

// serveBroker is `orderly-bench -serve-broker`: the embedded broker alone,
// printing its address and serving until stdin closes.
func serveBroker(partitions int, stdout, stderr io.Writer) int {
	b, err := startBenchBroker(partitions)
	if err != nil {
		return failer("serve-broker", stderr)(err)
	}
	defer b.Close()
	fmt.Fprintln(stdout, b.Addr())
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// brokerProcess is the embedded broker in a child process
// (`orderly-bench -serve-broker`), which serves until its stdin closes.
type brokerProcess struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	addr  string
	wait  chan error
}

// startChild starts this executable as `orderly-bench args...`, killed
// should this process die, with pipes to its stdin and from its stdout.
func startChild(what string, stderr io.Writer, args ...string) (*exec.Cmd, io.WriteCloser, io.ReadCloser, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, nil, nil, err
	}
	cmd := exec.Command(exe, args...)
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, nil, fmt.Errorf("unable to start the %s process: %w", what, err)
	}
	return cmd, stdin, stdout, nil
}

// startBrokerProcess starts the broker child and waits for its address.
func startBrokerProcess(partitions int, stderr io.Writer) (*brokerProcess, error) {
	cmd, stdin, stdout, err := startChild("broker", stderr, "-serve-broker", "-partitions", strconv.Itoa(partitions))
	if err != nil {
		return nil, err
	}
	b := &brokerProcess{cmd: cmd, stdin: stdin, wait: make(chan error, 1)}
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- strings.TrimSpace(l)
		_, _ = io.Copy(io.Discard, stdout)
		b.wait <- cmd.Wait()
	}()
	select {
	case b.addr = <-line:
	case <-time.After(30 * time.Second):
	}
	if b.addr == "" {
		b.close()
		return nil, errors.New("the broker process did not report its address")
	}
	return b, nil
}

// startBroker starts the bench broker where f.broker says and returns its
// address, the child (nil: in this process) and the function that stops it.
func startBroker(f benchFlags, stderr io.Writer) (string, *brokerProcess, func(), error) {
	if f.broker == "process" {
		bp, err := startBrokerProcess(f.partitions, stderr)
		if err != nil {
			return "", nil, nil, err
		}
		return bp.addr, bp, bp.close, nil
	}
	eb, err := startBenchBroker(f.partitions)
	if err != nil {
		return "", nil, nil, fmt.Errorf("starting the broker: %w", err)
	}
	return eb.Addr(), nil, eb.Close, nil
}

// cpu returns the child's user+system CPU time so far (/proc/PID/stat); 0
// for a nil b, a broker in this process.
func (b *brokerProcess) cpu() time.Duration {
	if b == nil {
		return 0
	}
	return processCPU(b.cmd.Process.Pid)
}

// close closes the child's stdin and waits for it to exit, killing it
// after 10 seconds.
func (b *brokerProcess) close() {
	_ = b.stdin.Close()
	select {
	case <-b.wait:
	case <-time.After(10 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.wait
	}
}
