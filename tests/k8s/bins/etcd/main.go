// Command etcd runs the etcd server of go.etcd.io/etcd/server/v3 (its etcdmain package),
// for Weir's test control plane.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
